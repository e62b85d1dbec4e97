import sys

try:
    from .cli.main import main
except KeyboardInterrupt:  # Ctrl-C while the package's first modules load
    print("interrupted", file=sys.stderr)
    raise SystemExit(130) from None

raise SystemExit(main())
