"""Drivers on top of the compiler: the CLI, the demo, explain, routing-trace recording, benchmarks.

Nothing in the core (ir, detect, passes, pipeline, backend, codegen) imports from here.
"""
