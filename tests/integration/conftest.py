import sys
from pathlib import Path

# jobs.py (the subprocess helpers) sits beside the tests.
sys.path.insert(0, str(Path(__file__).parent))
