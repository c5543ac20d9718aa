"""Not a test: one process of a multi-process training run for test_distributed.py. It is `launch.train`
(same flags, same distributed start) but also writes process 0's per-step losses, exactly, as JSON.

    python tests/distributed_driver.py --losses=FILE --workdir=DIR --config=... [--config.a.b=V] [distributed flags]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from launch import common  # noqa: E402
from ultrathink_jax import cli  # noqa: E402
from ultrathink_jax.config_files import parse_config_args  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--losses", required=True)
    common.add_distributed_args(parser)

    def run() -> int:
        args, config = parse_config_args(parser, sys.argv[1:])
        common.start_distributed(args, "driver")
        import jax

        from ultrathink_jax.train import train

        result = train(config, args.workdir)
        if jax.process_index() == 0:
            Path(args.losses).write_text(json.dumps({str(k): v for k, v in result.losses.items()}))
        return 0

    return cli.run_main("driver", run)


if __name__ == "__main__":
    sys.exit(main())
