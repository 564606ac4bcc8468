"""A small world we control: procedural shapes (`generator`), the base text-to-image model (`model`,
`text`, `pretrain`) and the world-CLIP (`clip`) that scores it. Weights are committed beside the code
and regenerate from their seeds."""
