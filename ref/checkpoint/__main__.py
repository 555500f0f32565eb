"""python -m ref.checkpoint check DIR|REPO: validate, summarise and lint a checkpoint (ref.checkpoint_check)."""
import sys

from ref.cli import exit_on_interrupt

exit_on_interrupt("ref.checkpoint")  # before any library starts a thread: threads inherit the blocked signals

from ref.checkpoint_check import main  # noqa: E402

sys.exit(main())
