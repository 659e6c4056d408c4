"""
A dataclass config from the command line: defaults < preset < JSON files < --key=value, and
--help written from the dataclass's comments. Imports only plumbing.files.
"""
import difflib
import inspect
import json
import re
from dataclasses import fields, replace

from plumbing.files import read_json


# ----------------------------------------------------------------------------------------
# A dataclass config from the command line: defaults < preset < JSON files < --key=value

def field_docs(cls):
    """{field: its trailing comment} and the section comments, read from the class's source:
    the dataclass's own comments are its --help (one source of truth)."""
    docs, sections, section = {}, {}, ""
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [\w\[\], ]+ = .*?(?:#\s*(.*))?$", line)
        if m:
            docs[m.group(1)], sections[m.group(1)] = (m.group(2) or "").strip(), section
        elif re.match(r"\s+# ", line):
            section = line.strip()[2:]
    return docs, sections


def flag_line(flag, doc):
    """One --help line: the flag with its default, then what it does (on the next line when the
    flag is long)."""
    return f"{flag:<34} {doc}" if len(flag) < 34 else f"{flag}\n{'':34} {doc}"


def config_help(cls, presets, usage):
    docs, sections = field_docs(cls)
    lines, section = [usage, "", f"presets: {', '.join(presets)} (--preset=NAME sets the "
                              "defaults below; JSON files, then flags, override them)"], None
    for f in fields(cls):
        if sections[f.name] != section:
            section = sections[f.name]
            lines += ["", f"{section}:"]
        value = (str(f.default).lower() if isinstance(f.default, bool)
                 else f.default if f.default != "" else '""')
        lines.append(flag_line(f"  --{f.name}={value}", docs[f.name]))
    return "\n".join(lines)


def _type(f):
    return {"int": int, "float": float, "str": str, "bool": bool}.get(f.type, f.type)


def parse_value(f, text):
    if _type(f) is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--{f.name}: expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        return _type(f)(text)
    except ValueError:
        raise ValueError(f"--{f.name}: expected {_type(f).__name__}, got {text!r}") from None


def check_json_value(f, value, path):
    """A value from a JSON config file must already have the field's type (no "false" strings)."""
    typ = _type(f)
    if not (type(value) is typ or (typ is float and type(value) is int)):
        raise ValueError(
            f"config file {path}: {f.name!r} is {json.dumps(value)}, expected a JSON "
            f"{ {int: 'integer', float: 'number', str: 'string', bool: 'true/false'}[typ] }")
    return float(value) if typ is float else value


def closest(key, known):
    """The known key most like `key`, or None."""
    close = difflib.get_close_matches(key, known, n=1)
    return close[0] if close else None


def unknown_key(key, known, where):
    close = closest(key, known)
    hint = f"did you mean --{close}?" if close else "see --help for every key"
    return ValueError(f"{where}unknown config key --{key}; {hint}")


def read_config_file(path, known):
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"config file {path}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"config file {path}: expected a JSON object of config keys, found "
                         f"{type(d).__name__}")
    bad = sorted(set(d) - set(known))
    if bad:
        close = closest(bad[0], known)
        raise ValueError(f"config file {path}: unknown key(s) {bad}"
                         + (f"; did you mean {close!r}?" if close else ""))
    return {k: check_json_value(known[k], v, path) for k, v in d.items()}


def parse_flags(argv, cls):
    """--key=value flags and JSON config file paths -> ({key: value}, [file paths])."""
    known = {f.name: f for f in fields(cls)}
    overrides, files = {}, []
    for arg in argv:
        if not arg.startswith("--"):
            files.append(arg)
            continue
        key, eq, val = arg[2:].partition("=")
        if key not in known:
            raise unknown_key(key, known, "")
        if not eq:
            raise ValueError(f"--{key}: expected --{key}=value")
        if key in overrides:
            raise ValueError(f"--{key} given twice; give each flag once")
        overrides[key] = parse_value(known[key], val)
    return overrides, files


def build_config(cls, presets, overrides, files, base=None):
    """The config: base (default: the dataclass defaults + the preset) < files < overrides."""
    known = {f.name: f for f in fields(cls)}
    from_files = {}
    for path in files:
        from_files.update(read_config_file(path, known))
    if base is not None:
        return replace(base, **{**from_files, **overrides})
    preset = overrides.get("preset", from_files.get("preset", "tiny"))
    if preset not in presets:
        raise ValueError(f"--preset={preset!r}; expected one of {sorted(presets)}")
    return replace(cls(), **{**presets[preset], **from_files, **overrides, "preset": preset})


def saved_config(cls, path):
    """The config a run saved (its run_config.json at `path`) as a `cls`, keys it lacks at their
    defaults; a file that is not a JSON object of config keys is a ValueError naming it."""
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a JSON object of config keys (train.py writes it)")
    return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


def wants_help(argv):
    return any(a in ("-h", "--help") for a in argv)
