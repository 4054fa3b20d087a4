"""Publish a finished run to the Hugging Face Hub: ``python push_model.py --run_dir DIR --repo_id USER/NAME``."""

from cifar_accel.cli import push_main

if __name__ == "__main__":
    push_main()
