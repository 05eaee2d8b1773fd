"""The benchmark harness of issue 5: EdgeAgentExecutor vs LocalExecutor vs edge3's EdgeExecutor.

Entry point: ``python -m bench.run`` (``make bench``). See ``bench/README.md``.
"""
