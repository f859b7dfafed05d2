import sys

from hf2fairseq.convert import main

sys.exit(main())
