"""A procedural text-to-image world: a prompt grammar, ground-truth renders, and the data the
`mini` pipeline is pretrained on."""

from apexcli.world.grammar import Scene, parse_prompt, prompts, sample_scene, scene_to_prompt
from apexcli.world.render import layout, render

__all__ = ["Scene", "layout", "parse_prompt", "prompts", "render", "sample_scene", "scene_to_prompt"]
