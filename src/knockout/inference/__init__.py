"""Statistical inference on a run's per-document sums: paired comparisons of two methods (:mod:`.paired`), the
sequential design that decides every pair with as many neuron sets as needed (:mod:`.sequential`), and the
faithfulness of circuits with its curves (:mod:`.faithfulness`). Pure numpy; the runner uses it to decide when to stop
adding sets, the reports to state the answer."""
