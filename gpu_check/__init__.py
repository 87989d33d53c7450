"""fastclip's check on a GPU machine: run.sh and its helpers (README.md)."""
