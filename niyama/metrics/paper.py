"""Published numbers to compare against, Llama-3-8B on one A100-80GB.

The Azure rows of the paper used the 2024 one-week Azure traces; ours are
the 2023 ones, so compare those by ratio. ShareGPT is the artifact's file.
"""

# Fig. 7: per-replica goodput (QPS), values read off the figure.
FIG7_GOODPUT = {
    "azure-code": {"fcfs": 1.5, "edf": 2.6, "niyama": 3.8},
    "azure-conv": {"fcfs": 2.8, "edf": 3.5, "niyama": 4.3},
    "sharegpt": {"fcfs": 1.4, "edf": 1.8, "niyama": 2.1},
}

# Table 5: ablation on Azure Code, all requests important: capacity (QPS) and violations (%) at 6 QPS.
TABLE5_ABLATION = {
    "edf": (2.75, 100.0),
    "edf-dc": (3.3, 74.0),
    "niyama-alpha0": (3.6, 26.0),
    "niyama": (3.65, 16.0),
}
