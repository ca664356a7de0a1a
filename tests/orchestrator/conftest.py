"""Makes the shared helpers of this folder (train_helpers) importable from the subfolders' tests."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
