"""Performance scripts and their recorded results (benchmarks/README.md). Each script runs from the
repository root as `python -m benchmarks.<script>`; what several of them share is in
`benchmarks.common`."""
