"""The inference engine: requests -> scheduler -> paged latent cache -> model runner -> sampling."""
