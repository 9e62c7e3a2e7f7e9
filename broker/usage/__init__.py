"""What agents cost: usage reported by gateways, priced by the policy's price table, attributed
from the delegation token, counted against budgets (reserved at the fetch, settled by the
report), alerted on, and exported for finance.

- `pricing`: pure: the price of a reported call.
- `budgets`: pure: which budgets a call or fetch counts against, periods, thresholds.
- `state`: the usage bookkeeping in the state store (call ids, fetch tickets).
- `service`: `UsageService` (``POST /v1/usage``) and `BudgetGate` (the fetch's reservation).
"""
