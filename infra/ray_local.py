"""Ray Train's fixed scaling policy, less its autoscaling coordinator, for the local Ray we start.

Ray Train V2's scaling policy registers every fit's resources with an `AutoscalingCoordinator`, a detached actor
that tells a cluster's autoscaler (and Ray Data) what the run needs: the first fit on a Ray starts it (one more
Python process), and each fit asks it for resources and cancels them. A local Ray has no autoscaler to tell, so
`infra.ray_cluster.torch_trainer` gives a fit there this policy instead (`python -m bench.orchestration`: the
first fit on a fresh Ray). On a cluster (`RAY_ADDRESS`) the policy stays Ray's.
"""

from __future__ import annotations

from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy


class LocalScalingPolicy(FixedScalingPolicy):
    """The same decisions (the configured worker count, always), with no resource requests to send."""

    def _maybe_send_resource_request(self) -> None:
        pass

    def _send_resource_request(self) -> None:
        pass

    def _cancel_resource_request(self) -> None:
        pass
