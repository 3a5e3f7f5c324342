"""Generated gRPC/protobuf stubs of protos/ (regenerate with `make proto`; never edit by hand)."""
