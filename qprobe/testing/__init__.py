"""Test harness shipped for qprobe's own tests, its fault report, and plugin authors.

`servers`: a fault-injecting OpenAI-compatible stub server (and the real llama.cpp
server, where installed). `faults`: kill / fault / hostile-input scenarios run
against the CLI. Nothing here is imported by `import qprobe`.
"""
