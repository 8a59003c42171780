"""Production monitoring: ptrace's comparison against a live serving endpoint, as Prometheus
metrics.

``client`` speaks to an OpenAI-compatible endpoint; ``canary`` sends it a golden bundle's
prompts and compares the answers (``ptrace monitor``); ``metrics`` holds the canary's Prometheus
registry; ``textfile`` writes a comparison or a canary cycle as a metrics file
(``--metrics-file``). ``monitoring/`` at the top of the repository has the alert rules and the
Grafana dashboard that read these metrics.

The modules import ``prometheus_client``; nothing here is imported until a command needs it.
"""
