def parallelize_deepseek_v4(model, parallel_dims, job_config):
    raise NotImplementedError
