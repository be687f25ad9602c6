"""The job runner: runs a stored job to the end, recording its task tree in the ledger
(docs/RUNS.md). Engine code: no CLI; the server and the REST API call the same functions."""
