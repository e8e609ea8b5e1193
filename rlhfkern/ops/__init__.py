"""One module per op family: its reference (the spec), its custom ops and its backend choice."""
