"""Nested-dict access by key path, for parameter trees addressed by name."""


def get_path(tree, path):
    """tree[path[0]][path[1]]..."""
    for name in path:
        tree = tree[name]
    return tree


def set_path(tree, path, value):
    """Sets tree[path[0]]...[path[-1]] = value, creating dicts on the way."""
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value
