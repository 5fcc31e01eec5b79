"""Names of training data in a config, read without TensorFlow (config checks use it)."""


def parse_split(spec):
    """'name[:version]:split' -> ('name[:version]', 'split')."""
    name, sep, split = spec.rpartition(":")
    if not sep or not name or not split:
        raise ValueError(f"{spec!r} is not 'name[:version]:split' (e.g. 'synthetic_shapes:train')")
    return name, split
