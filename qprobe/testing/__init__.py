"""Test harness shipped for qprobe's own tests, its fault report, and plugin authors.

`servers`: a fault-injecting OpenAI-compatible stub server (and the real llama.cpp
server, where installed). Scenarios run against the CLI, each module by what it tests:
`resume` (kill -9 and resume), `server_faults` (a faulty, dead or shared server),
`bad_files` (broken input files), `misuse` (misused commands, forged rewards); with
`runner` (running the CLI), `inputs` (rows, files, a tiny model) and `scenario` (what
the first two share). Nothing here is imported by `import qprobe`, and importing it
changes no environment variable.
"""
