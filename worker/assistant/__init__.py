"""Reply generators: the seam (base) and the implementations a worker can run."""
