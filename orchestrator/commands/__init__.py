"""One module per `sdo` command group; each is a thin wrapper over library functions."""
