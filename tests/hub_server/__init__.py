"""A local Hub-compatible HTTP server for tests (test support code, not part of the package).

It speaks the part of the Hugging Face Hub's HTTP surface that ``huggingface_hub`` 2.x uses to
create repos, commit files, tag revisions, list refs/trees/commits and download files (see
``docs/hub-protocol.md`` in the shared docs). Blobs live on disk under ``root``; repos, commits
and refs live in memory. Every request is logged, and faults can be injected::

    hub = LocalHub(tmp_path, token="hf_test_secret").start()
    hub.fail("POST", r"/commit/", status=500, times=1)     # the next commit answers 500
    hub.fail("POST", r"/commit/", status="drop")            # ... or the connection is closed
    HfApi(endpoint=hub.url, token="hf_test_secret").create_repo("user/repo")
    hub.count("POST", "/commit/")                           # how many commit requests arrived

Every file is answered ``"regular"`` at preupload, so content travels base64 inside the commit
and neither LFS nor Xet is ever involved (no ``HF_HUB_DISABLE_XET`` needed).

Modules: ``storage`` (repos, commits, blobs: plain data), ``server`` (``LocalHub``: lifecycle,
storage operations and the test controls), ``protocol`` (the HTTP handler: routing and the Hub's
JSON answers). The pytest fixtures ``local_hub`` and ``hub_env`` are registered in
``tests/conftest.py``; ``hub_env`` also points code that takes no endpoint at the server.
"""

from .server import LocalHub
from .storage import Commit, Entry, HubError, LoggedRequest, Repo, git_blob_sha1

__all__ = ["Commit", "Entry", "HubError", "LocalHub", "LoggedRequest", "Repo", "git_blob_sha1"]
