"""The five steps of the loop, in the order ``workbench.loop.Run.step`` calls them:

    generate  prompts -> Rollouts (sampled answers + behaviour log-probs)   steps/generate/
    score     Rollouts -> rewards, advantages                              steps/score.py
    buffer    which (stale) batch the next update trains on                steps/buffer.py
    reweight  per-token loss of the objective (ratio / clip / mask)        steps/reweight/
    update    one optimizer step on that loss                              steps/update.py

Each step is a plain function or small class over ``workbench.rollouts.Rollouts``; the loop owns
the state (weights, optimizer, buffer, knobs) and calls them by name.
"""
