"""The names of what a run folder (``--output_dir``) holds: every module that reads or writes one uses these.

docs/run-folder.md describes each entry.
"""

RUN_CONFIG_FILE = "train_config.json"  # the settings and what the run derived from them (replayable)
METRICS_FILE = "metrics.jsonl"  # one record per epoch
SUMMARY_FILE = "summary.csv"  # the same records as a table
RESULTS_FILE = "results.json"  # best and final metrics, timings
PLOTS_FOLDER = "plots"
CURVES_PLOT = "curves.png"
CONFUSION_PLOT = "confusion_matrix.png"
BEST_MODEL_FOLDER = "best"  # the saved model: safetensors, config.json, model card
TRACKER_FOLDER = "logs"  # tensorboard's event files
CHECKPOINTS_FOLDER = "checkpoints"
SEEDS_SUMMARY_FILE = "seeds.json"  # train --seeds: beside the seed_N run folders, what they say together
REPLACED_RUN = ".replaced_run"  # an overwritten run, kept until the new one finishes an epoch

# Everything a run writes: what --overwrite_output_dir sets aside, and nothing else.
RUN_FILES = (
    RUN_CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, RESULTS_FILE, PLOTS_FOLDER, BEST_MODEL_FOLDER, TRACKER_FOLDER,
    CHECKPOINTS_FOLDER,
)  # fmt: skip
# What train_config.json records beside the settings (run_start.resolved_settings): derived, so --config does not
# replay it, and compare does not group runs by it.
RUN_RECORD_ONLY = (
    "base_model", "hub_model", "num_processes", "global_batch_size", "num_train_examples", "num_eval_examples",
    "selection_split", "dataset_fingerprint", "dataset_revision", "dataset_pretty_name", "class_names", "mean", "std",
    "environment", "subset_seed",
)  # fmt: skip
# The records that compare, push and the model card read back.
RUN_RECORDS = (RUN_CONFIG_FILE, RESULTS_FILE, METRICS_FILE)
# Published beside the model by a push.
RUN_FILES_PUBLISHED = (RUN_CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, RESULTS_FILE)
