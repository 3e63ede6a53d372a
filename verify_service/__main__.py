from specdec.verify_service.server import main

main()
