"""TrainConfig.validate: every value that cannot work is refused in one line naming the flag."""

import pytest

from cifar_accel.errors import UserError
from cifar_accel.settings import parse_train_args


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs must be more than 0 and at most a million, got 0"),
        (["--epochs", "nan"], "--epochs must be more than 0 and at most a million, got nan"),
        (["--eval_epochs", "0"], "--eval_epochs must be at least 1, got 0"),
        (
            ["--eval_strategy", "no", "--validation_size", "10"],
            "--validation_size selects the best epoch; with --eval_strategy no nothing is selected",
        ),
        (["--compile_mode", "max-autotune"], "--compile_mode max-autotune needs --compile"),
        (["--muon_learning_rate", "0.1"], "--muon_learning_rate applies to --optimizer muon, not sgd"),
        (["--optimizer", "adamw", "--muon_momentum", "0.9"], "--muon_momentum applies to --optimizer muon, not adamw"),
        (["--optimizer", "muon", "--muon_momentum", "1"], "--muon_momentum must be in \\[0, 1\\), got 1$"),
        (["--optimizer", "muon", "--muon_learning_rate", "inf"], "--muon_learning_rate must be a positive finite"),
        (["--whiten_bias_decay"], "--whiten_bias_decay needs --whiten_bias_epochs"),
        (["--whiten_bias_lr_scale", "0"], "--whiten_bias_lr_scale must be a positive finite number, got 0"),
        (["--warmup_start_fraction", "1.5"], "--warmup_start_fraction must be in \\[0, 1\\], got 1.5"),
        (["--learning_rate", "-1"], "--learning_rate must be a positive finite number, got -1$"),
        (["--learning_rate", "inf"], "--learning_rate must be a positive finite number, got inf"),
        (["--learning_rate", "nan"], "--learning_rate must be a positive finite number, got nan"),
        (["--batch_size", "0"], "--batch_size must be 1 to 2\\^31, got 0"),
        (["--batch_size", str(10**20)], "--batch_size must be 1 to 2\\^31"),
        (["--milestones", "0.5", "0.5"], "--milestones must be increasing"),
        (["--warmup_fraction", "1.5"], "--warmup_fraction must be in \\[0, 1\\], got 1.5"),
        (["--seed", "-1"], "--seed must be in \\[0, 2\\^32\\), got -1"),
        (["--seed", str(2**32)], "--seed must be in \\[0, 2\\^32\\)"),
        (["--momentum", "1"], "--momentum must be in \\[0, 1\\), got 1$"),
        (["--label_smoothing", "2"], "--label_smoothing must be in \\[0, 1\\), got 2$"),
        (["--crop_padding", "32"], "--crop_padding must be 0 to 31 \\(less than the image side\\), got 32"),
        (["--cutout", "40"], "--cutout must be 0 to 31 \\(smaller than the image\\), got 40"),
        (["--gamma", "-0.1"], "--gamma must be a positive finite number, got -0.1"),
        (["--milestones", "0.8", "0.5"], "--milestones must be increasing fractions of training in \\(0, 1\\)"),
        (["--milestones", "1.5"], "--milestones must be increasing fractions"),
        (["--num_workers", "1000"], "--num_workers must be 0 to 64, got 1000"),
        (["--weight_decay", "-1"], "--weight_decay must be zero or a positive finite number"),
        (["--mixup", "-0.2"], "--mixup must be 0 \\(off\\) or a positive finite alpha, got -0.2"),
        (["--cutmix", "inf"], "--cutmix must be 0 \\(off\\) or a positive finite alpha, got inf"),
        (["--model_ema", "1"], "--model_ema must be 0 \\(off\\) or a decay in \\(0, 1\\), got 1$"),
        (["--max_grad_norm", "0"], "--max_grad_norm must be a positive finite number, got 0$"),
        (["--max_train_steps", "0"], "--max_train_steps must be 1 to 2\\^31, got 0$"),
        (["--num_warmup_steps", "-1"], "--num_warmup_steps must be 0 to 2\\^31, got -1$"),
        (["--max_grad_norm", "nan"], "--max_grad_norm must be a positive finite number, got nan"),
        # Valid in float64, but 0 or infinite in the float32 tensors they become (torch's Beta refuses a 0 alpha).
        (["--cutmix", "1e-300"], "--cutmix must be at least 1.1755e-38 \\(the smallest normal float32, .*got 1e-300$"),
        (["--mixup", "1e-300"], "--mixup must be at least 1.1755e-38 \\(the smallest normal float32, .*got 1e-300$"),
        (["--mixup", "1e39"], "--mixup must be at most 3.4028e\\+38 \\(the largest float32\\), got 1e\\+39$"),
        (["--max_grad_norm", "1e-300"], "--max_grad_norm must be at least 1.1755e-38 .*, got 1e-300$"),
        (["--learning_rate", "1e-300"], "--learning_rate must be at least 1.1755e-38 .*, got 1e-300$"),
        # Digits that str.isdigit takes but are not ASCII: int() refuses '\u00b2' and reads '\u0663' as 3.
        (["--checkpointing_steps", "\u00b2"], "--checkpointing_steps must be a positive number .*, got '\u00b2'$"),
        (["--checkpointing_steps", "\u0663"], "--checkpointing_steps must be a positive number .*, got '\u0663'$"),
        (["--dataset", ""], "--dataset must name a Hub dataset or a folder"),
    ],
)
def test_impossible_values_are_rejected_with_the_flag_name(argv, message):
    with pytest.raises(UserError, match=message):
        parse_train_args(argv)
