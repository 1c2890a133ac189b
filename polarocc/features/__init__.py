"""Feature extraction into resumable zarr stores, in process or on a dask cluster."""
