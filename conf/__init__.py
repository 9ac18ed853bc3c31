# Loading this package (Hydra does, to read the files) registers the schemas the files extend.
from nsa_dist.config import register_schemas

register_schemas()
