"""One DiT forward at Wan-14B shapes vs diffusers and the roofline: see ``wanstudio bench --help``."""

import sys

from wanstudio.bench import main

if __name__ == "__main__":
    sys.exit(main())
