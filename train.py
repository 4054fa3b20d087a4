"""Train a CIFAR-10 classifier: ``accelerate launch --config_file accelerate_config.yaml train.py --help``."""

from cifar_accel.cli import train_main

if __name__ == "__main__":
    train_main()
