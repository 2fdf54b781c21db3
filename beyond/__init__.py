"""What the project does beyond chapter 6, one capability per module. The
chapter's four files import these; nothing here imports them back."""
import warnings

# torch warns on import when NumPy is absent; this project never uses NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
