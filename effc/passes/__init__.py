"""The compiler's passes: functions IR -> IR (or IR -> plan). Their order is `effc.compiler.PIPELINE`."""
