import os
import time
from mlx_flash.calibrate import collect_calibration
from mlx_flash.storage.format import open_flash
from mlx_flash.platform_blas import numpy_blas_single_thread
files = open_flash(os.environ["FLASH"])
t=time.time()
with numpy_blas_single_thread():
    d = collect_calibration(files, tokens=int(os.environ.get("TOKENS", 6144)), max_new_tokens=int(os.environ.get("MAX_NEW", 96)))
d.save(os.environ["CALDATA"])
print(d.X.shape, time.time()-t)
