"""python -m ref.checkpoint check DIR|REPO: validate, summarise and lint a checkpoint (ref.checkpoint_check)."""
import sys

from ref.checkpoint_check import main

sys.exit(main())
