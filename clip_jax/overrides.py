"""Config overrides (`key=value`), read one way wherever they come from.

The trainer's `--config.KEY=VALUE` flags are parsed by ml_collections with the
absl parser of the field's type. The same parsers read every other way to set
a key: a config file's knobs (`configs/clip.py:tiny,lock_image=False`),
`python -m clip_jax.benchmark ... --set KEY=VALUE`, sweeps and tests, so one
text means one value everywhere: `False`, `false` and `0` are False for a bool
field, an int field refuses `1.5`, a tuple field takes `(0.8, 1.0)` or
`0.8,1.0`, and a field that is None takes a value of its declared type.
"""

from absl import flags
from ml_collections.config_flags import tuple_parser

# The parsers ml_collections' config flags use, by field type.
_PARSERS = {bool: flags.BooleanParser(), int: flags.IntegerParser(),
            float: flags.FloatParser(), str: flags.ArgumentParser(),
            tuple: tuple_parser.TupleParser()}


def _parent(config, key):
    """(node holding the last part of dotted `key`, that part)."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        if not hasattr(node, "keys") or part not in node:
            raise ValueError(f"no config key {key!r}")
        node = node[part]
    if not hasattr(node, "keys") or leaf not in node:
        raise ValueError(f"no config key {key!r}")
    return node, leaf


def lookup(config, key):
    """config's value at dotted `key` ('model.image.width')."""
    node, leaf = _parent(config, key)
    return node[leaf]


def parse(config, key, text):
    """`text` as a value of config's field `key`, parsed as the trainer's flags
    parse it; a ValueError names the key, the text and the field's type."""
    node, leaf = _parent(config, key)
    field_type = node.get_type(leaf)
    parser = _PARSERS.get(field_type)
    if parser is None:
        raise ValueError(f"config.{key} holds a {field_type.__name__}; it cannot be set "
                         f"from text")
    try:
        return parser.parse(text)
    except (ValueError, TypeError, SyntaxError) as error:
        detail = error.args[0] if error.args else error
        raise ValueError(f"config.{key}={text!r}: not a valid {field_type.__name__} ({detail})") from None


def split(assignment):
    """'key=value' -> (key, value text); a leading 'config.' is dropped."""
    key, equals, text = assignment.partition("=")
    if not equals or not key:
        raise ValueError(f"override {assignment!r}: expected key=value, e.g. model.remat=full")
    return key.removeprefix("config."), text


def apply(config, overrides):
    """Sets each override on the unlocked `config`: 'key=value' texts, or a
    {key: value} mapping whose string values are parsed as texts and whose
    other values are set as they are."""
    items = overrides.items() if hasattr(overrides, "items") else map(split, overrides)
    for key, value in items:
        node, leaf = _parent(config, key)
        node[leaf] = parse(config, key, value) if isinstance(value, str) else value
