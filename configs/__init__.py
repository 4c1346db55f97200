"""Typed job configuration: YAML sections -> dataclasses (see configs/config.py and configs/loader.py)."""
from configs.config import (SECTIONS, DataConfig, JobConfig, LoggingConfig, MonitorConfig, OptimConfig,
                            ParallelConfig, ScheduleConfig, SourceConfig, TrainConfig)
from configs.loader import build_config, config_to_dict, dump_config, load_config, parse_override

__all__ = ["SECTIONS", "DataConfig", "JobConfig", "LoggingConfig", "MonitorConfig", "OptimConfig",
           "ParallelConfig", "ScheduleConfig", "SourceConfig", "TrainConfig", "build_config", "config_to_dict", "dump_config",
           "load_config", "parse_override"]
