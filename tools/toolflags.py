"""
The command line of the research tools (experiment.py, handoff_study.py, real_experiment.py):
each tool's own --key=value flags, every other --key=value flag goes to train.py. -h / --help
prints the tool's usage, its flags with their defaults, and train.py's flags.
"""
import os
import sys
from dataclasses import fields

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from plumbing.flags import config_help, flag_line, unknown_key, wants_help  # noqa: E402


def help_text(usage, own):
    """usage, then `own` ({flag: (default, what it does)}), then train.py's flags."""
    usage = usage.strip()
    lines = [usage if usage.lower().startswith("usage") else f"usage: {usage}", "",
             "flags of this tool:"]
    for key, (default, doc) in own.items():
        lines.append(flag_line(f"  --{key}={default if default != '' else chr(34) * 2}", doc))
    train_help = config_help(train.TrainConfig, train.PRESETS, "")
    return "\n".join(lines + ["", "every other --key=value flag goes to train.py (JSON config "
                                  "files too):" + train_help])


def parse(argv, own, reserved=()):
    """-> (opts: {flag: value string, the default where not given}, train_argv). A --key that is
    neither the tool's nor train.py's is an error naming the closest flag of either; so is a
    train.py flag in `reserved` (the tool sets it itself)."""
    opts = {key: default for key, (default, _) in own.items()}
    train_keys = [f.name for f in fields(train.TrainConfig)]
    train_argv = []
    for arg in argv:
        key, eq, val = arg[2:].partition("=")
        if arg.startswith("--") and key in own:
            if not eq:
                raise ValueError(f"--{key}: expected --{key}=value")
            opts[key] = val
        elif arg.startswith("--") and key in reserved:
            raise ValueError(f"--{key}: set by this tool itself; see --help for its own flags")
        elif arg.startswith("--") and key not in train_keys:
            raise unknown_key(key, [*own, *train_keys], "")
        else:
            train_argv.append(arg)           # train.py's flag or config file, checked by it
    return opts, train_argv


def resuming(train_argv):
    """train_argv + --resume=true, naming its preset when it names neither a preset nor a config
    file: train.py then builds each run's config from these flags (one folder holds several
    variants), not from the folder's saved run_config.json (train.get_config)."""
    named = any(a.startswith("--preset=") or not a.startswith("--") for a in train_argv)
    return ([] if named else [f"--preset={train.TrainConfig.preset}"]) + train_argv \
        + ["--resume=true"]


def asks_help(argv, usage, own):
    """Print the help and return True if argv has -h / --help."""
    if wants_help(argv):
        print(help_text(usage, own))
        return True
    return False
