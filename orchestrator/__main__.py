from specdec.orchestrator.server import main

main()
