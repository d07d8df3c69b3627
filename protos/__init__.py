"""gRPC wire contract of moe-cluster: .proto sources and their generated Python stubs."""
