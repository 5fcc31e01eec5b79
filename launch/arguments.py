"""Command-line conventions shared by the launchers: own flags, then `--`, then
flags passed through to the trainer."""


def split_at_double_dash(argv):
    """(launcher args, trainer args after the first `--`)."""
    if "--" not in argv:
        return list(argv), []
    index = argv.index("--")
    return list(argv[:index]), list(argv[index + 1:])


def parse_with_trainer_args(parser, argv):
    """(options, trainer args): --config and any --config.KEY=VALUE among the
    launcher's own flags, then everything after `--`. Other unknown flags are a
    usage error naming them."""
    own_args, extra_args = split_at_double_dash(argv)
    options, unknown = parser.parse_known_args(own_args)
    overrides = [arg for arg in unknown if arg.startswith("--config.")]
    if len(overrides) < len(unknown):
        parser.error(f"unrecognized arguments: {' '.join(a for a in unknown if a not in overrides)}"
                     " (trainer flags go after `--`; overrides as --config.KEY=VALUE)")
    config = ["--config", options.config] if options.config else []
    return options, config + overrides + extra_args
