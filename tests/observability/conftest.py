import sys
from pathlib import Path

# The helpers module beside the tests (the test folders are not packages).
sys.path.insert(0, str(Path(__file__).parent))
