from verify_service.server import main

main()
