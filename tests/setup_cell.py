# Setup: installs nanopar when it is missing (Colab), then names the hardware tier.
import importlib.util, subprocess, sys
if importlib.util.find_spec("nanopar") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+REPO_URL"], check=True)
import nanopar
print(nanopar.devices.describe())
