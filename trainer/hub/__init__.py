"""The Model step: Hub ids and tokens, checks of model folders, the local Hugging Face cache, the Hub's API,
resumable downloads and search. Layered with no cycle, lowest first: names, credentials, remote, folder_check,
cache, resolve, download, search; a module imports only those before it, at module top
(tests/test_import_hygiene.py checks it)."""
