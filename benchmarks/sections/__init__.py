"""One module per benchmark section; each defines `run(args) -> list[Row]`."""
