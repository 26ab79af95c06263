"""The Model step: Hub ids and tokens, checks of model folders, the local Hugging Face cache, the Hub's API,
resumable downloads and search. Layered with no cycle, lowest first: names, credentials, remote, folder_check,
cache, resolve, download, search (import-linter checks it)."""
